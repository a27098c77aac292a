"""The `hivenet` command line: REST API client commands, `serve`, and the sub-app registry.

Entry point `hivenet.cli.main:app`. Everything here talks to the API over HTTP through
`hivenet.api.client`; nothing here touches the store directly.
"""
