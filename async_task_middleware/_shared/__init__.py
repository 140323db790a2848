"""What both sides build on: the wire format, the Redis scripts, the Celery binding and the
deployment's Redis settings, routes, the owner policy, metrics and types. It imports neither side.
"""
