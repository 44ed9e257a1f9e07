-- Calls over CPaaS media streams: which carrier a call uses (`sip`, or
-- `twilio`, `telnyx`, `plivo`, `vonage`). A stream call the provider did
-- not describe has an empty `to_number`.
ALTER TABLE calls ADD COLUMN carrier TEXT NOT NULL DEFAULT 'sip';
