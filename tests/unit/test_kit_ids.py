"""`uuid5_text` is `str(uuid.uuid5(...))`, for any namespace and name."""

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kit.ids import uuid5_text

pytestmark = pytest.mark.unit


@given(namespace=st.uuids(), name=st.text())
def test_uuid5_text_equals_the_standard_library(namespace: uuid.UUID, name: str) -> None:
    assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name))
