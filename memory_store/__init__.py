"""memory_store"""
