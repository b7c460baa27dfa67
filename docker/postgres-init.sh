#!/bin/sh
# The DBA's part of a deployment, run once by the postgres image when its data folder is new
# (/docker-entrypoint-initdb.d): the database and its owner, the extensions a superuser must
# create, imgembed's group roles and the workers' login. Everything after runs without a superuser:
# migrations as the owner, workers and dispatchers as `embedder`.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v owner_password="$IMGEMBED_OWNER_PASSWORD" -v worker_password="$IMGEMBED_WORKER_PASSWORD" <<'SQL'
CREATE ROLE imgembed_owner LOGIN CREATEROLE PASSWORD :'owner_password';
CREATE DATABASE imgembed OWNER imgembed_owner;
CREATE ROLE imgembed_reader NOLOGIN;
CREATE ROLE imgembed_worker NOLOGIN;
GRANT imgembed_reader, imgembed_worker TO imgembed_owner WITH ADMIN OPTION;
CREATE ROLE embedder LOGIN PASSWORD :'worker_password' IN ROLE imgembed_worker;
\connect imgembed
CREATE EXTENSION vector;
CREATE SCHEMA imgembed_dblink AUTHORIZATION imgembed_owner;
CREATE EXTENSION dblink SCHEMA imgembed_dblink;
SQL
