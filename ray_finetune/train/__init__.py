"""Training engine: model loading, the step, the schedule, checkpoint I/O. Plain torch/DeepSpeed, no Ray."""
