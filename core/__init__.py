"""What every process of a job shares: the config schema, the data pipeline, the checkpoint layout,
the evaluation metrics and the user-facing errors. It sits below `actors/` and above `models/` and
`store/`; it never imports Ray."""
