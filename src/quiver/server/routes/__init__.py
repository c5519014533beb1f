"""The Hub API, one router per resource."""
