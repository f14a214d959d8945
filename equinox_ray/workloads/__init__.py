"""Request traces and workload generators."""
