"""Finding credential-like strings: outbound body inspection and inbound response redaction.

Pure, precomputed matchers with no I/O. The gate feeds them bytes: aegisd/gate/outbound_inspection.py
(pipeline step 8) and aegisd/gate/response_redaction.py (the response side of step 11).
"""

from aegisd.inspection.inspector import VAULT_SECRET, Inspector, SecretSource
from aegisd.inspection.redactor import REDACTED, Redaction, StreamRedactor

__all__ = ["REDACTED", "VAULT_SECRET", "Inspector", "Redaction", "SecretSource", "StreamRedactor"]
