"""Developer mode (`turnserver dev`, `make run`): a ready-to-use local server
(`local_server`), its start banner with a credential (`banner`), a self-signed certificate
(`selfsigned`) and live impairment of relayed media over HTTP (`impairment_api`)."""
