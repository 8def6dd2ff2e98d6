"""Knowledge distillation on CIFAR-100: data, models, loss, training loop, checkpoints, logs."""
