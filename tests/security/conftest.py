"""The test PKI, made once per session."""

from __future__ import annotations

import pytest
from tls_certs import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
