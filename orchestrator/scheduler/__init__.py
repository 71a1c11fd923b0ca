"""The scheduler process: off-peak windows, recurring jobs and the reconciler.

``process`` runs APScheduler 3 while it holds the scheduler lease (``lease``); its persistent
job store (recurring schedules) is a table in the orchestrator's own database. Each periodic
task is a module: ``keeper`` opens and closes windows and releases deferred jobs, ``recurring``
submits one job per schedule occurrence, ``reconciler`` re-publishes jobs whose broker message
is gone.
"""
