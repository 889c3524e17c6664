"""The shared vocabulary of Gatehouse: events, commands and subjects.

Nothing else lives here. Every type is a msgspec Struct; new fields get defaults,
field types never change, and unknown fields are ignored, so an old reader keeps
working when a newer writer adds to an event.
"""
