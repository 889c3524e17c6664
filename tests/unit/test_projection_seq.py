"""A delivered message's stream sequence, read from its ack subject, agrees with nats-py's."""

import pytest
from nats.aio.msg import Msg

from services.kit.projection import seq_of

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.GATEHOUSE_EVENTS.audit.1.4711.12.1763802000000000000.0",  # v1
        "$JS.ACK.hub.ACCHASH.GATEHOUSE_EVENTS.audit.3.4711.12.1763802000000000000.5.rnd",  # v2, domain
    ],
)
def test_the_stream_sequence_of_each_ack_subject_form(reply: str) -> None:
    msg = Msg(None, subject="evt.x", reply=reply, data=b"{}")  # type: ignore[arg-type]
    assert seq_of(msg) == msg.metadata.sequence.stream == 4711
