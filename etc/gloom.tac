# Gloom as a twistd application file:  twistd -ny etc/gloom.tac
# It builds the same service as `twistd -n gloom`; edit the settings below.
from twisted.application.service import Application

from gloom.tap import Options, makeService

MASTER = "tcp:9998:interface=127.0.0.1"   # where masters connect
SLAVE = "tcp:9999:interface=127.0.0.1"    # where slaves connect
MAX_FRAME = 64 * 1024 * 1024              # largest frame a peer may send, bytes
RETRIES = 3                               # re-queues after a slave disconnects

options = Options()
options.parseOptions([
    "--master", MASTER,
    "--slave", SLAVE,
    "--max-frame", str(MAX_FRAME),
    "--retries", str(RETRIES),
])

application = Application("gloom")
makeService(options).setServiceParent(application)
