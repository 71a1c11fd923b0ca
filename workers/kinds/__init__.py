"""Built-in job kinds. Each module declares its kinds with ``@kind`` when imported."""
