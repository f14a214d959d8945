"""equinox-ray: holistic fair scheduling for multi-user LLM serving."""
