"""The database layer: models, engine, migrations and the job store."""
