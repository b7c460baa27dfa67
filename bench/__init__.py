"""The benchmark (``imgembed bench``): kept out of the runtime path; nothing in imgembed imports it.
Its results are written to docs/results/RESULTS.md in the repository."""
