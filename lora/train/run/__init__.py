"""A run's segment: resume or start (start.py), the loop (loop.py), stop rules and what is due
between steps (schedule.py), the run folder's rules (runfolder.py), the training log, signals."""
