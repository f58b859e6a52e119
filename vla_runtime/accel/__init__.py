"""Training-free acceleration methods as removable hooks on a `PolicyStructure`."""
