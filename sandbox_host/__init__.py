"""What runs inside an activation: limits, the replay runtime and the step API."""
