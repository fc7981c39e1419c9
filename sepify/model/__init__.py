"""Reading, validating and preparing a model: the file and its external data, shape inference and
resolution, and the read-only graph view every command analyzes."""
