"""The dispatcher's use cases.

`BuildBook` (book.py) is the event-sourced store of builds: synchronous load, decide, save
(run it in a worker thread). `Builds` (builds.py) is what the commands call: it checks the
request, asks the secrets service whether the agent key exists and the quota service for a
slot, records the build, queues its order, and relays what runner nodes report. Its
collaborators are ports (ports.py) so the rules can be exercised without NATS.
"""

from services.dispatcher.application.book import BuildBook
from services.dispatcher.application.builds import Builds
from services.dispatcher.application.ports import MissingKey, OverLimit, Unavailable
from services.dispatcher.application.views import build_view

__all__ = ["BuildBook", "Builds", "MissingKey", "OverLimit", "Unavailable", "build_view"]
