"""Analysis of a table's vectors with scikit-learn: clusters, and 2-D maps (install
``imgembed[analysis]``)."""
