"""agentd"""
