"""dcd stages: one module per pipeline stage, each with one entry point taking a config."""
