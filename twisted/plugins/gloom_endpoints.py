"""Registers the ``mtls:`` server endpoint string (mutual TLS); see gloom.tls."""

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    prefix = "mtls"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from gloom.tls import mutual_tls_endpoint

        return mutual_tls_endpoint(reactor, *args, **kwargs)


mtls = MutualTLSServerParser()
