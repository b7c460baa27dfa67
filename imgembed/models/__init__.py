"""Models: what a model name means, the configurations and weights shipped with imgembed, and the
database's registry of models."""
