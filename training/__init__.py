"""Training: fine-tuning OpenCLIP models on image+caption pairs, and generated shapes with captions
as data that needs no download."""
