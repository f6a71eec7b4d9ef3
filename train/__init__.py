"""The applications: the trainer, the `hyperdas` command line, the DeepSpeed entry script and configs."""
