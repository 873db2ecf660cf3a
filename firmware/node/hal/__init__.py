"""Board HALs: the only modules that touch port-specific hardware APIs."""
