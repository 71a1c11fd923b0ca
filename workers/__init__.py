"""The data plane: the worker runtime and the job kinds it runs."""
