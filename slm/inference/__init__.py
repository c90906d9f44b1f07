"""Running a model: load any checkpoint for inference, sample with a KV cache, stream text, and the llama.cpp and
OpenVINO runtimes with their scorers. Stages (generate, selfknow, quantize, bench) and the evaluation layer build on
this; it builds on slm.model and slm.formats."""
