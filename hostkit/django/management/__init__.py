"""Management commands of the hostkit Django app."""
