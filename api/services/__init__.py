"""The control plane's services: the work behind the routes (jobs on the Ray Jobs API, models on Ray Serve)."""
