"""The Ray Serve application: OpenAI-compatible ingress, the fairness controller actor, GPU pools."""
