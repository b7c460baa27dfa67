"""The ONNX Runtime room of the worker: exporting OpenCLIP's towers to ONNX (float32 and int8
weights), the export cache and its pruning, and running the towers with the model's preprocessing
and tokenizer rebuilt without PyTorch. Nothing here imports torch but the export itself."""
