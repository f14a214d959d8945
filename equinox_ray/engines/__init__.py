"""Inference engines: vLLM (real) and a simulated GPU, behind one interface."""
