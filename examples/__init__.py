"""The demo (``imgembed demo``): kept out of the runtime path; nothing in imgembed imports it."""
