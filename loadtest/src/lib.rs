//! voxgate-loadtest: plays the far end of many concurrent calls against a
//! running voxgate and measures what a caller hears (post-dial delay,
//! voice-to-voice latency, barge-in, loss and jitter). Empty until the issue
//! "voxgate-loadtest" lands.
