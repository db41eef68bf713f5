"""The privacy auditor's commands: verify what left a site, the ledger, versions, canaries."""
