"""The broker behind the ``unix`` transport: one process that owns the queues.

``python -m transports.broker unix:///abs/dir/broker.sock`` (or ``celery-bench broker``)
serves a 0600 socket in a private directory until SIGINT/SIGTERM: in-memory queues,
direct/topic/fanout routing, push delivery with prefetch, at-least-once to consumers,
back-pressure instead of loss, bounded memory and work per client. The wire protocol is
:mod:`transports.protocol`; what it promises, and what was measured, is in
docs/transports.md.

* :mod:`.model`: limits, queues/exchanges/channels/clients and their processes' shares,
  routing; :mod:`.topic`: topic matching.
* :mod:`.loop`: the selector loop (reading, writing, timeouts); :mod:`.flow`: its
  back-pressure; :mod:`.handlers`: one handler per request.
* :mod:`.launcher`: :func:`serve`, :func:`start` / :func:`running` (a subprocess), the CLI.
"""
from ..protocol import socket_path_from_url
from .launcher import BrokerProcess, _cli, main, running, serve, start
from .loop import Broker, _socket_accepts, prepare_socket_dir
from .model import DEFAULT_COALESCE_S, Limits, TopicPattern, topic_matches

__all__ = ("Broker", "BrokerProcess", "DEFAULT_COALESCE_S", "Limits", "TopicPattern", "main",
           "prepare_socket_dir", "running", "serve", "start", "socket_path_from_url",
           "topic_matches", "_cli", "_socket_accepts")
