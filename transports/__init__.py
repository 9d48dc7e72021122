"""Kombu transports for a producer and consumers on one host.

* ``unix://`` (:mod:`transports.unix`): a UNIX domain socket to the small broker
  process in :mod:`transports.broker`.
* ``fifo://`` (:mod:`transports.fifo`): named pipes.

Importing this package registers both URL schemes with Kombu, which has no entry
points for transports; do it before the first ``Connection`` is made. Importing
again changes nothing.
"""
from kombu.transport import TRANSPORT_ALIASES

TRANSPORT_ALIASES["unix"] = "transports.unix:Transport"
TRANSPORT_ALIASES["fifo"] = "transports.fifo:Transport"
