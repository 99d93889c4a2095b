"""What both sides need to run a server: start it, probe it, warm it, materialize its
inputs at fixed paths. Imports only the standard library and the store (runner-safe)."""
