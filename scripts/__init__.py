"""Project scripts: the demo entry point (demo.py) and the machinery it shares with tests and benchmarks.

supervisor.py: child processes in their own groups, stopped together; admin_client.py: the server's
admin API; recall.py: held-out recall of model versions; demo_settings.py: the demo's settings and
command line; keyboard_stage.py: the demo's personalization and keyboard stage; console.py: its
terminal output; errors.py: its failure type.
"""
