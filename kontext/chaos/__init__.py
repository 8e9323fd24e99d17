"""Fault injection: Kontext's services as processes under load while faults hit them.

``python -m kontext.chaos`` (``make chaos``) runs every scenario and prints a
table: jobs submitted, answered, lost, answered twice, and recovery time.
"""
