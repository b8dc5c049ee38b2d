"""Registers the ``mtls:`` server endpoint string (mutual TLS); see
``gloom.tls``."""

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    """Parses ``mtls:`` server endpoint strings; ``gloom.tls`` is imported
    only when one is used."""

    prefix = "mtls"

    def parseStreamServer(self, reactor, *args, **kwargs):
        """Build the endpoint: the string's fields are the arguments of
        ``gloom.tls.mutual_tls_endpoint`` after ``reactor``."""
        from gloom.tls import mutual_tls_endpoint

        return mutual_tls_endpoint(reactor, *args, **kwargs)


mtls = MutualTLSServerParser()
