"""The process around the library: start-up, the command-line ending, safe outputs."""
