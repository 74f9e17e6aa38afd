"""What the training step adds: tap losses, regularizers, weight schedules,
the backend-free loss assembly (`step`) and one trainer per backend."""
