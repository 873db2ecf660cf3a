"""Field tools for installers and technicians: `lantern diag` and `lantern provision`."""
