-- Wireshark dissector for the volstream wire protocol, version 1.
--
-- docs/PROTOCOL.md is the normative description; this file follows it section by section and
-- names every field, frame type, flag, option bit and reason exactly as it does. A change to the
-- protocol changes this file in the same commit; tests/dissector.rs checks the tables here
-- against the document and the dissection against a real transfer.
--
-- Use:
--   tshark -X lua_script:tools/wireshark/volstream.lua -d tcp.port==7700,volstream -V -r x.pcap
-- or copy it into ~/.local/lib/wireshark/plugins/. Connections on the port preference (default
-- 7700) are dissected, and any TCP connection whose first bytes are the Hello magic.

local volstream = Proto("volstream", "volstream volume streaming protocol")

-- Section 2 and 4: sizes and limits.
local MAGIC = "VOLSTRM\n"
local HELLO_LEN = 32
local HEADER_LEN = 12
local MIN_MAX_FRAME = 4096
local MIN_STREAM_WINDOW = 8192
local MAX_NAME_LEN = 255
local MAX_MESSAGE_LEN = 1024
-- Without the receiver's Hello (a capture started mid-connection) its max_frame is unknown: a
-- longer frame is shown but not reassembled, so garbage cannot make tshark buffer gigabytes.
local UNKNOWN_MAX_FRAME = 16 * 1024 * 1024

-- Section 4.2.
local TYPES = {
    [1] = "OPEN", [2] = "ACCEPT", [3] = "REJECT", [4] = "DATA", [5] = "HOLE", [6] = "WINDOW",
    [7] = "FINISH", [8] = "ABORT", [9] = "PING", [10] = "PONG", [11] = "GOAWAY",
    [12] = "RANGES",
}
local T = {}
for code, name in pairs(TYPES) do T[name] = code end

-- Section 4.2, OPEN.
local OPS = { [1] = "READ", [2] = "WRITE", [3] = "LIST", [4] = "EXTENTS", [5] = "DIGESTS" }

-- Section 5.
local REASONS = {
    [1] = "PROTOCOL", [2] = "INTERNAL", [3] = "NOT_FOUND", [4] = "ALREADY_EXISTS",
    [5] = "PERMISSION_DENIED", [6] = "INVALID_NAME", [7] = "IO", [8] = "NO_SPACE",
    [9] = "DIGEST_MISMATCH", [10] = "CANCELLED", [11] = "TOO_MANY_STREAMS",
    [12] = "FLOW_CONTROL", [13] = "TIMEOUT", [14] = "CONNECTION_LOST", [15] = "UNSUPPORTED",
    [16] = "GOING_AWAY", [17] = "DEVICE_TOO_SMALL",
}

-- Section 3.2.
local SPARSE, DIGEST, PRIORITY, VERIFY, QCOW2, RANGES = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
local BLOCK_DIGESTS, UPDATE, RESUME = 0x100, 0x400, 0x800
local IDENTITY = 0x200
local FEATURES_RESERVED = 0xfffff0c0
local OP_DIGESTS = 5
-- Section 4.2, FINISH and RANGES flags.
local FLAG_ACK, FLAG_DIGEST = 0x01, 0x02
local FLAG_LAST = 0x01
-- Section 4.2, ACCEPT's flag; 6.6.
local FLAG_IDENTITY = 0x01
local MAX_IDENTITY_LEN = 64
-- Section 4.3.
local OPTION_PRIORITY = 0x40
local OPTION_TOP_ONLY = 0x80
-- Section 4.3: OPEN's header flags.
local FLAG_VERIFY, FLAG_QCOW2, FLAG_RANGES, FLAG_UPDATE = 0x01, 0x02, 0x04, 0x08
-- Section 8.4: an OPEN with UPDATE carries the result's volume checksum after its name.
local UPDATE_CHECKSUM_LEN = 32
-- Section 8.5: an OPEN with RESUME carries a token and the source's identity digest after that.
local FLAG_RESUME, RESUME_KEY_LEN = 0x10, 64

local f = {
    -- Section 2: the Hello record.
    hello = ProtoField.none("volstream.hello", "Hello"),
    magic = ProtoField.string("volstream.hello.magic", "magic"),
    version_min = ProtoField.uint16("volstream.hello.version_min", "version_min", base.DEC),
    version_max = ProtoField.uint16("volstream.hello.version_max", "version_max", base.DEC),
    features = ProtoField.uint32("volstream.hello.features", "features", base.HEX),
    feature_sparse = ProtoField.bool("volstream.hello.features.SPARSE", "SPARSE", 32, nil, SPARSE,
        "holes may travel as HOLE frames"),
    feature_digest = ProtoField.bool("volstream.hello.features.DIGEST", "DIGEST", 32, nil, DIGEST,
        "a data sender's FINISH carries a CRC-32C the receiver checks"),
    feature_priority = ProtoField.bool("volstream.hello.features.PRIORITY", "PRIORITY", 32, nil,
        PRIORITY, "OPEN may put a stream in the priority class"),
    feature_verify = ProtoField.bool("volstream.hello.features.VERIFY", "VERIFY", 32, nil,
        VERIFY, "OPEN may ask the sink to read the volume back"),
    feature_qcow2 = ProtoField.bool("volstream.hello.features.QCOW2", "QCOW2", 32, nil,
        QCOW2, "OPEN may ask the sink to write a qcow2 image"),
    feature_ranges = ProtoField.bool("volstream.hello.features.RANGES", "RANGES", 32, nil,
        RANGES, "a READ may ask for some ranges of the volume"),
    feature_block_digests = ProtoField.bool("volstream.hello.features.BLOCK_DIGESTS",
        "BLOCK_DIGESTS", 32, nil, BLOCK_DIGESTS, "OPEN may ask for op DIGESTS"),
    feature_identity = ProtoField.bool("volstream.hello.features.IDENTITY", "IDENTITY", 32, nil,
        IDENTITY, "a READ's ACCEPT may carry the volume's identity"),
    feature_update = ProtoField.bool("volstream.hello.features.UPDATE", "UPDATE", 32, nil,
        UPDATE, "a WRITE may update an existing volume by ranges"),
    feature_resume = ProtoField.bool("volstream.hello.features.RESUME", "RESUME", 32, nil,
        RESUME, "an upload may continue a partial the server kept"),
    feature_reserved = ProtoField.uint32("volstream.hello.features.reserved", "reserved",
        base.HEX, nil, FEATURES_RESERVED),
    max_frame = ProtoField.uint32("volstream.hello.max_frame", "max_frame", base.DEC),
    stream_window = ProtoField.uint32("volstream.hello.stream_window", "stream_window", base.DEC),
    conn_window = ProtoField.uint32("volstream.hello.conn_window", "conn_window", base.DEC),
    max_streams = ProtoField.uint32("volstream.hello.max_streams", "max_streams", base.DEC),

    -- Section 4.1: the frame header.
    length = ProtoField.uint32("volstream.length", "length", base.DEC, nil, nil,
        "body length in bytes, header excluded"),
    type = ProtoField.uint8("volstream.type", "type", base.DEC, TYPES),
    flags = ProtoField.uint8("volstream.flags", "flags", base.HEX),
    flag_ack = ProtoField.bool("volstream.flags.ACK", "ACK", 8, nil, FLAG_ACK,
        "set: the receiver's confirmation; clear: the data sender's end of content"),
    flag_digest = ProtoField.bool("volstream.flags.DIGEST", "DIGEST", 8, nil, FLAG_DIGEST,
        "the digest field is meaningful"),
    reserved = ProtoField.uint16("volstream.reserved", "reserved", base.HEX),
    stream = ProtoField.uint32("volstream.stream", "stream", base.DEC, nil, nil,
        "stream id; 0 names the connection"),
    body = ProtoField.bytes("volstream.body", "body"),

    -- Section 4.2: the bodies.
    open_op = ProtoField.uint8("volstream.open.op", "op", base.DEC, OPS),
    open_options = ProtoField.uint8("volstream.open.options", "options", base.HEX),
    option_allocated = ProtoField.bool("volstream.open.options.ALLOCATED", "ALLOCATED", 8, nil,
        0x01, "the sink must end fully allocated"),
    option_destination_is_zero = ProtoField.bool("volstream.open.options.DESTINATION_IS_ZERO",
        "DESTINATION_IS_ZERO", 8, nil, 0x02, "the sink already reads as zeroes"),
    option_no_extents = ProtoField.bool("volstream.open.options.NO_EXTENTS", "NO_EXTENTS", 8, nil,
        0x04, "the source ignores its extent map"),
    option_overwrite = ProtoField.bool("volstream.open.options.OVERWRITE", "OVERWRITE", 8, nil,
        0x08, "an existing volume may be written over"),
    option_no_sparse = ProtoField.bool("volstream.open.options.NO_SPARSE", "NO_SPARSE", 8, nil,
        0x10, "holes are sent as zero DATA"),
    option_force_share = ProtoField.bool("volstream.open.options.FORCE_SHARE", "FORCE_SHARE", 8,
        nil, 0x20, "the source may be read while it is in use"),
    option_priority = ProtoField.bool("volstream.open.options.PRIORITY", "PRIORITY", 8, nil,
        OPTION_PRIORITY, "the stream is in the priority class"),
    option_top_only = ProtoField.bool("volstream.open.options.TOP_ONLY", "TOP_ONLY", 8, nil,
        OPTION_TOP_ONLY, "only a layered source's own clusters are data"),
    flag_verify = ProtoField.bool("volstream.flags.VERIFY", "VERIFY", 8, nil, FLAG_VERIFY,
        "OPEN: the sink reads the volume back before it gets its name"),
    flag_qcow2 = ProtoField.bool("volstream.flags.QCOW2", "QCOW2", 8, nil, FLAG_QCOW2,
        "OPEN: the sink writes the volume as a qcow2 image"),
    flag_ranges = ProtoField.bool("volstream.flags.RANGES", "RANGES", 8, nil, FLAG_RANGES,
        "OPEN: RANGES frames follow; only those ranges are sent"),
    flag_update = ProtoField.bool("volstream.flags.UPDATE", "UPDATE", 8, nil, FLAG_UPDATE,
        "OPEN: a WRITE that updates the volume; its checksum follows the name"),
    open_checksum = ProtoField.bytes("volstream.open.checksum", "checksum"),
    flag_resume = ProtoField.bool("volstream.flags.RESUME", "RESUME", 8, nil, FLAG_RESUME,
        "OPEN: names a partial upload; a token and the source's identity digest follow"),
    open_token = ProtoField.bytes("volstream.open.resume_token", "resume token"),
    open_source = ProtoField.bytes("volstream.open.resume_source", "resume source"),
    flag_last = ProtoField.bool("volstream.flags.LAST", "LAST", 8, nil, FLAG_LAST,
        "RANGES: the stream's range list is complete"),
    flag_identity = ProtoField.bool("volstream.flags.IDENTITY", "IDENTITY", 8, nil,
        FLAG_IDENTITY, "ACCEPT: the volume's identity follows the size"),
    ranges_offset = ProtoField.uint64("volstream.ranges.offset", "offset", base.DEC),
    ranges_len = ProtoField.uint64("volstream.ranges.len", "len", base.DEC),
    open_name_len = ProtoField.uint16("volstream.open.name_len", "name_len", base.DEC),
    open_zero_granularity = ProtoField.uint32("volstream.open.zero_granularity",
        "zero_granularity", base.DEC),
    open_size = ProtoField.uint64("volstream.open.size", "size", base.DEC),
    open_name = ProtoField.string("volstream.open.name", "name", base.UNICODE),
    accept_size = ProtoField.uint64("volstream.accept.size", "size", base.DEC),
    accept_identity = ProtoField.bytes("volstream.accept.identity", "identity", base.NONE,
        "the volume's identity (6.6): opaque, compared for equality only"),
    reject_reason = ProtoField.uint32("volstream.reject.reason", "reason", base.DEC, REASONS),
    reject_message = ProtoField.string("volstream.reject.message", "message", base.UNICODE),
    data_offset = ProtoField.uint64("volstream.data.offset", "offset", base.DEC),
    data_payload = ProtoField.bytes("volstream.data.payload", "payload"),
    hole_offset = ProtoField.uint64("volstream.hole.offset", "offset", base.DEC),
    hole_len = ProtoField.uint64("volstream.hole.len", "len", base.DEC),
    window_increment = ProtoField.uint32("volstream.window.increment", "increment", base.DEC),
    finish_length = ProtoField.uint64("volstream.finish.length", "length", base.DEC),
    finish_digest = ProtoField.uint32("volstream.finish.digest", "digest", base.HEX),
    abort_reason = ProtoField.uint32("volstream.abort.reason", "reason", base.DEC, REASONS),
    abort_message = ProtoField.string("volstream.abort.message", "message", base.UNICODE),
    ping_data = ProtoField.bytes("volstream.ping.data", "data"),
    pong_data = ProtoField.bytes("volstream.pong.data", "data"),
    goaway_last_stream = ProtoField.uint32("volstream.goaway.last_stream", "last_stream",
        base.DEC),
    goaway_reason = ProtoField.uint32("volstream.goaway.reason", "reason", base.DEC, REASONS),
    goaway_message = ProtoField.string("volstream.goaway.message", "message", base.UNICODE),
}
local field_list = {}
for _, field in pairs(f) do field_list[#field_list + 1] = field end
volstream.fields = field_list

local function violation(abbrev, text)
    return ProtoExpert.new("volstream.expert." .. abbrev, text, expert.group.MALFORMED,
        expert.severity.ERROR)
end

local e = {
    -- Section 3: the handshake checks (each ends the connection).
    versions = violation("versions", "Hello version range is empty or does not include 1"),
    small_max_frame = violation("small_max_frame", "Hello max_frame is below 4096"),
    small_windows = violation("small_windows",
        "Hello stream_window is below 8192 or conn_window below stream_window"),
    reserved_features = ProtoExpert.new("volstream.expert.reserved_features",
        "Reserved feature bits set (sent as 0 by version 1, ignored on receipt)",
        expert.group.PROTOCOL, expert.severity.NOTE),
    -- Section 4.1: header checks, in the order a receiver applies them.
    too_large = violation("too_large", "Frame body exceeds the receiver's max_frame"),
    reserved = violation("reserved", "Reserved header bits are not zero"),
    unknown_type = violation("unknown_type", "Unknown frame type"),
    bad_flags = violation("bad_flags", "Flags not defined for this frame type"),
    bad_stream = violation("bad_stream", "Stream id not allowed for this frame type"),
    bad_length = violation("bad_length", "Body length impossible for this frame type"),
    -- Section 4.2: body checks.
    bad_op = violation("bad_op", "Unknown OPEN op"),
    bad_name = violation("bad_name", "OPEN name_len or name is invalid"),
    bad_message = violation("bad_message", "Message is not UTF-8"),
    hole_without_sparse = violation("hole_without_sparse",
        "HOLE frame although SPARSE was not negotiated"),
    priority_without_feature = violation("priority_without_feature",
        "OPEN asks for the priority class although PRIORITY was not negotiated"),
    verify_without_feature = violation("verify_without_feature",
        "OPEN asks for verification although VERIFY was not negotiated"),
    digests_without_feature = violation("digests_without_feature",
        "OPEN asks for block digests although BLOCK_DIGESTS was not negotiated"),
    identity_without_feature = violation("identity_without_feature",
        "ACCEPT carries an identity although IDENTITY was not negotiated"),
    -- Stream errors (section 6.4) and oddities that are not violations.
    empty_content = ProtoExpert.new("volstream.expert.empty_content",
        "DATA or HOLE covering no bytes (aborts the stream)", expert.group.PROTOCOL,
        expert.severity.WARN),
    ignored_digest = ProtoExpert.new("volstream.expert.ignored_digest",
        "digest is not 0 although the DIGEST flag is clear", expert.group.PROTOCOL,
        expert.severity.WARN),
    unknown_reason = ProtoExpert.new("volstream.expert.unknown_reason",
        "Reason code unknown to version 1 (kept and reported as an error code)",
        expert.group.PROTOCOL, expert.severity.NOTE),
    unframed = ProtoExpert.new("volstream.expert.unframed",
        "The receiver ends the connection at this header; the bytes after it are not framed",
        expert.group.MALFORMED, expert.severity.NOTE),
}
local expert_list = {}
for _, ef in pairs(e) do expert_list[#expert_list + 1] = ef end
volstream.experts = expert_list

-- Per direction of each TCP connection: what its Hello announced (the limits and features the
-- other direction's frames are checked against). Rebuilt when a capture is (re)read.
local hellos = {}
local tcp_stream = Field.new("tcp.stream")

local function direction_key(pinfo, from_source)
    local stream = tcp_stream()
    local id = stream and tostring(stream.value) or "?"
    if from_source then
        return id .. " " .. tostring(pinfo.src) .. ":" .. pinfo.src_port
    end
    return id .. " " .. tostring(pinfo.dst) .. ":" .. pinfo.dst_port
end

function volstream.init()
    hellos = {}
end

-- Rust's str::from_utf8 rules: no overlong forms, no surrogates, nothing above U+10FFFF.
local function is_utf8(s)
    local i, n = 1, #s
    while i <= n do
        local c = s:byte(i)
        local need, lo, hi = 0, 0x80, 0xbf
        if c < 0x80 then
            need = 0
        elseif c >= 0xc2 and c <= 0xdf then
            need = 1
        elseif c >= 0xe0 and c <= 0xef then
            need = 2
            if c == 0xe0 then lo = 0xa0 elseif c == 0xed then hi = 0x9f end
        elseif c >= 0xf0 and c <= 0xf4 then
            need = 3
            if c == 0xf0 then lo = 0x90 elseif c == 0xf4 then hi = 0x8f end
        else
            return false
        end
        if i + need > n then return false end
        for k = 1, need do
            local b = s:byte(i + k)
            local min, max = 0x80, 0xbf
            if k == 1 then min, max = lo, hi end
            if b < min or b > max then return false end
        end
        i = i + need + 1
    end
    return true
end

local function bit_names(value, names)
    local parts = {}
    for _, entry in ipairs(names) do
        if bit32.band(value, entry[1]) ~= 0 then parts[#parts + 1] = entry[2] end
    end
    return table.concat(parts, "|")
end

local function reason_text(code)
    return REASONS[code] or ("error code " .. code)
end

local function add_reason(tree, field, range)
    local code = range:uint()
    local item = tree:add(field, range)
    if REASONS[code] == nil then item:add_proto_expert_info(e.unknown_reason) end
    return code
end

local function add_message(tree, field, tvb, offset, len)
    if len == 0 then return end
    local range = tvb(offset, len)
    local item = tree:add_packet_field(field, range, ENC_UTF_8)
    if len > MAX_MESSAGE_LEN or not is_utf8(range:raw()) then
        item:add_proto_expert_info(e.bad_message)
    end
end

-- Section 2 and 3. Returns the Info text.
local function dissect_hello(tvb, pinfo, tree, offset)
    local t = tree:add(volstream, tvb(offset, HELLO_LEN), "volstream Hello")
    t:add(f.hello, tvb(offset, HELLO_LEN)):set_hidden()
    t:add(f.magic, tvb(offset, 8))
    local vmin, vmax = tvb(offset + 8, 2):uint(), tvb(offset + 10, 2):uint()
    t:add(f.version_min, tvb(offset + 8, 2))
    local vitem = t:add(f.version_max, tvb(offset + 10, 2))
    if vmin > vmax or vmin > 1 or vmax < 1 then vitem:add_proto_expert_info(e.versions) end
    local features = tvb(offset + 12, 4):uint()
    local ft = t:add(f.features, tvb(offset + 12, 4))
    ft:add(f.feature_sparse, tvb(offset + 12, 4))
    ft:add(f.feature_digest, tvb(offset + 12, 4))
    ft:add(f.feature_priority, tvb(offset + 12, 4))
    ft:add(f.feature_verify, tvb(offset + 12, 4))
    ft:add(f.feature_qcow2, tvb(offset + 12, 4))
    ft:add(f.feature_ranges, tvb(offset + 12, 4))
    ft:add(f.feature_block_digests, tvb(offset + 12, 4))
    ft:add(f.feature_identity, tvb(offset + 12, 4))
    ft:add(f.feature_update, tvb(offset + 12, 4))
    ft:add(f.feature_resume, tvb(offset + 12, 4))
    local fr = ft:add(f.feature_reserved, tvb(offset + 12, 4))
    if bit32.band(features, FEATURES_RESERVED) ~= 0 then
        fr:add_proto_expert_info(e.reserved_features)
    end
    local max_frame = tvb(offset + 16, 4):uint()
    local mitem = t:add(f.max_frame, tvb(offset + 16, 4))
    if max_frame < MIN_MAX_FRAME then mitem:add_proto_expert_info(e.small_max_frame) end
    local stream_window, conn_window = tvb(offset + 20, 4):uint(), tvb(offset + 24, 4):uint()
    t:add(f.stream_window, tvb(offset + 20, 4))
    local witem = t:add(f.conn_window, tvb(offset + 24, 4))
    if stream_window < MIN_STREAM_WINDOW or conn_window < stream_window then
        witem:add_proto_expert_info(e.small_windows)
    end
    t:add(f.max_streams, tvb(offset + 28, 4))
    hellos[direction_key(pinfo, true)] = { max_frame = max_frame, features = features }
    local names = bit_names(features,
        { { SPARSE, "SPARSE" }, { DIGEST, "DIGEST" }, { PRIORITY, "PRIORITY" },
          { VERIFY, "VERIFY" }, { QCOW2, "QCOW2" }, { RANGES, "RANGES" },
          { BLOCK_DIGESTS, "BLOCK_DIGESTS" }, { IDENTITY, "IDENTITY" },
          { UPDATE, "UPDATE" }, { RESUME, "RESUME" } })
    return string.format("Hello v%d..%d features %s max_frame %d", vmin, vmax,
        names == "" and "none" or names, max_frame)
end

-- Section 4.1: what the header alone allows, as (expert, text) or nil.
-- Bytes an OPEN carries after its name: UPDATE's checksum, then RESUME's key.
local function open_trailer(flags)
    local n = 0
    if bit32.band(flags, FLAG_UPDATE) ~= 0 then n = n + UPDATE_CHECKSUM_LEN end
    if bit32.band(flags, FLAG_RESUME) ~= 0 then n = n + RESUME_KEY_LEN end
    return n
end

local function header_problem(kind, flags, reserved, len, stream)
    if reserved ~= 0 then return e.reserved end
    if TYPES[kind] == nil then return e.unknown_type end
    local allowed = 0
    if kind == T.FINISH then allowed = bit32.bor(FLAG_ACK, FLAG_DIGEST) end
    if kind == T.OPEN then
        allowed = bit32.bor(FLAG_VERIFY, FLAG_QCOW2, FLAG_RANGES, FLAG_UPDATE, FLAG_RESUME)
    end
    if kind == T.RANGES then allowed = FLAG_LAST end
    if kind == T.ACCEPT then allowed = FLAG_IDENTITY end
    if bit32.band(flags, bit32.bnot(allowed)) ~= 0 then return e.bad_flags end
    local connection_level = kind == T.PING or kind == T.PONG or kind == T.GOAWAY
    if connection_level and stream ~= 0 then return e.bad_stream end
    if not connection_level and kind ~= T.WINDOW and stream == 0 then return e.bad_stream end
    local ok
    if kind == T.OPEN then
        local trailer = open_trailer(flags)
        ok = len >= 16 + trailer and len <= 16 + trailer + MAX_NAME_LEN
    elseif kind == T.ACCEPT and bit32.band(flags, FLAG_IDENTITY) ~= 0 then
        ok = len >= 9 and len <= 8 + MAX_IDENTITY_LEN
    elseif kind == T.ACCEPT or kind == T.PING or kind == T.PONG then
        ok = len == 8
    elseif kind == T.REJECT or kind == T.ABORT then
        ok = len >= 4 and len - 4 <= MAX_MESSAGE_LEN
    elseif kind == T.DATA then
        ok = len >= 8
    elseif kind == T.HOLE then
        ok = len == 16
    elseif kind == T.WINDOW then
        ok = len == 4
    elseif kind == T.FINISH then
        ok = len == 12
    elseif kind == T.GOAWAY then
        ok = len >= 8 and len - 8 <= MAX_MESSAGE_LEN
    elseif kind == T.RANGES then
        ok = len >= 16 and len <= 255 * 16 and len % 16 == 0
    end
    if not ok then return e.bad_length end
    return nil
end

-- Section 4.2: a body whose length already fits its type. Returns extra Info text.
local function dissect_body(tvb, pinfo, t, kind, flags, o, len)
    if kind == T.OPEN then
        local op = tvb(o, 1):uint()
        local opitem = t:add(f.open_op, tvb(o, 1))
        if OPS[op] == nil then opitem:add_proto_expert_info(e.bad_op) end
        -- Section 3.2: DIGESTS needs the BLOCK_DIGESTS feature from both Hellos.
        if op == OP_DIGESTS then
            local ours = hellos[direction_key(pinfo, true)]
            local theirs = hellos[direction_key(pinfo, false)]
            if ours and theirs and bit32.band(ours.features, theirs.features, BLOCK_DIGESTS) == 0 then
                opitem:add_proto_expert_info(e.digests_without_feature)
            end
        end
        local options = tvb(o + 1, 1):uint()
        local ot = t:add(f.open_options, tvb(o + 1, 1))
        ot:add(f.option_allocated, tvb(o + 1, 1))
        ot:add(f.option_destination_is_zero, tvb(o + 1, 1))
        ot:add(f.option_no_extents, tvb(o + 1, 1))
        ot:add(f.option_overwrite, tvb(o + 1, 1))
        ot:add(f.option_no_sparse, tvb(o + 1, 1))
        ot:add(f.option_force_share, tvb(o + 1, 1))
        local pitem = ot:add(f.option_priority, tvb(o + 1, 1))
        ot:add(f.option_top_only, tvb(o + 1, 1))
        -- Section 4.3: PRIORITY needs the PRIORITY feature from both Hellos.
        if bit32.band(options, OPTION_PRIORITY) ~= 0 then
            local ours = hellos[direction_key(pinfo, true)]
            local theirs = hellos[direction_key(pinfo, false)]
            if ours and theirs and bit32.band(ours.features, theirs.features, PRIORITY) == 0 then
                pitem:add_proto_expert_info(e.priority_without_feature)
            end
        end
        -- Section 4.3: so does VERIFY.
        if bit32.band(flags, FLAG_VERIFY) ~= 0 then
            local ours = hellos[direction_key(pinfo, true)]
            local theirs = hellos[direction_key(pinfo, false)]
            if ours and theirs and bit32.band(ours.features, theirs.features, VERIFY) == 0 then
                t:add_proto_expert_info(e.verify_without_feature)
            end
        end
        local name_len = tvb(o + 2, 2):uint()
        local nitem = t:add(f.open_name_len, tvb(o + 2, 2))
        t:add(f.open_zero_granularity, tvb(o + 4, 4))
        t:add(f.open_size, tvb(o + 8, 8))
        local name = ""
        local trailer = open_trailer(flags)
        local name_end = len - trailer
        if name_end > 16 then
            local range = tvb(o + 16, name_end - 16)
            name = range:raw()
            t:add_packet_field(f.open_name, range, ENC_UTF_8)
        end
        local at = o + name_end
        if bit32.band(flags, FLAG_UPDATE) ~= 0 then
            t:add(f.open_checksum, tvb(at, UPDATE_CHECKSUM_LEN))
            at = at + UPDATE_CHECKSUM_LEN
        end
        if bit32.band(flags, FLAG_RESUME) ~= 0 then
            t:add(f.open_token, tvb(at, 32))
            t:add(f.open_source, tvb(at + 32, 32))
        end
        if name_len ~= name_end - 16 or (name_len == 0) ~= (op == 3) or not is_utf8(name) then
            nitem:add_proto_expert_info(e.bad_name)
        end
        local text = " " .. (OPS[op] or ("op " .. op))
        if options ~= 0 then
            text = text .. " " .. bit_names(options, {
                { 0x01, "ALLOCATED" }, { 0x02, "DESTINATION_IS_ZERO" }, { 0x04, "NO_EXTENTS" },
                { 0x08, "OVERWRITE" }, { 0x10, "NO_SPARSE" }, { 0x20, "FORCE_SHARE" },
                { OPTION_PRIORITY, "PRIORITY" }, { OPTION_TOP_ONLY, "TOP_ONLY" } })
        end
        if bit32.band(flags, FLAG_VERIFY) ~= 0 then text = text .. " VERIFY"
        end
        if bit32.band(flags, FLAG_RANGES) ~= 0 then text = text .. " RANGES"
        end
        if bit32.band(flags, FLAG_UPDATE) ~= 0 then text = text .. " UPDATE"
        end
        if bit32.band(flags, FLAG_RESUME) ~= 0 then text = text .. " RESUME"
        end
        if name ~= "" then text = text .. " " .. name end
        return text
    elseif kind == T.ACCEPT then
        t:add(f.accept_size, tvb(o, 8))
        local text = " size " .. tvb(o, 8):uint64():tonumber()
        if len > 8 then
            local item = t:add(f.accept_identity, tvb(o + 8, len - 8))
            -- Section 6.6: only with IDENTITY from both Hellos.
            local ours = hellos[direction_key(pinfo, true)]
            local theirs = hellos[direction_key(pinfo, false)]
            if ours and theirs and bit32.band(ours.features, theirs.features, IDENTITY) == 0 then
                item:add_proto_expert_info(e.identity_without_feature)
            end
            text = text .. " identity " .. tvb(o + 8, len - 8):bytes():tohex():lower()
        end
        return text
    elseif kind == T.REJECT or kind == T.ABORT then
        local reason_field = kind == T.REJECT and f.reject_reason or f.abort_reason
        local message_field = kind == T.REJECT and f.reject_message or f.abort_message
        local code = add_reason(t, reason_field, tvb(o, 4))
        add_message(t, message_field, tvb, o + 4, len - 4)
        return " " .. reason_text(code)
    elseif kind == T.DATA then
        t:add(f.data_offset, tvb(o, 8))
        local payload = len - 8
        if payload > 0 then
            t:add(f.data_payload, tvb(o + 8, payload))
        else
            t:add_proto_expert_info(e.empty_content)
        end
        return string.format(" offset %s len %d", tvb(o, 8):uint64():tonumber(), payload)
    elseif kind == T.HOLE then
        local hole_len = tvb(o + 8, 8):uint64()
        t:add(f.hole_offset, tvb(o, 8))
        local litem = t:add(f.hole_len, tvb(o + 8, 8))
        if hole_len:tonumber() == 0 then litem:add_proto_expert_info(e.empty_content) end
        -- Section 8.2: HOLE needs SPARSE from both Hellos.
        local ours, theirs = hellos[direction_key(pinfo, true)], hellos[direction_key(pinfo, false)]
        if ours and theirs and bit32.band(ours.features, theirs.features, SPARSE) == 0 then
            t:add_proto_expert_info(e.hole_without_sparse)
        end
        return string.format(" offset %s len %s", tvb(o, 8):uint64():tonumber(),
            hole_len:tonumber())
    elseif kind == T.WINDOW then
        t:add(f.window_increment, tvb(o, 4))
        return " increment " .. tvb(o, 4):uint()
    elseif kind == T.FINISH then
        t:add(f.finish_length, tvb(o, 8))
        local ditem = t:add(f.finish_digest, tvb(o + 8, 4))
        if bit32.band(flags, FLAG_DIGEST) == 0 and tvb(o + 8, 4):uint() ~= 0 then
            ditem:add_proto_expert_info(e.ignored_digest)
        end
        local text = " length " .. tvb(o, 8):uint64():tonumber()
        if bit32.band(flags, FLAG_ACK) ~= 0 then text = text .. " ACK" end
        if bit32.band(flags, FLAG_DIGEST) ~= 0 then
            text = text .. string.format(" digest 0x%08x", tvb(o + 8, 4):uint())
        end
        return text
    elseif kind == T.PING or kind == T.PONG then
        t:add(kind == T.PING and f.ping_data or f.pong_data, tvb(o, 8))
        return ""
    elseif kind == T.GOAWAY then
        t:add(f.goaway_last_stream, tvb(o, 4))
        local code = add_reason(t, f.goaway_reason, tvb(o + 4, 4))
        add_message(t, f.goaway_message, tvb, o + 8, len - 8)
        return " last_stream " .. tvb(o, 4):uint() .. " " .. reason_text(code)
    elseif kind == T.RANGES then
        -- Section 6.5: the list is checked by the stream, not the frame.
        for i = 0, len / 16 - 1 do
            t:add(f.ranges_offset, tvb(o + 16 * i, 8))
            t:add(f.ranges_len, tvb(o + 16 * i + 8, 8))
        end
        local text = string.format(" %d ranges from %s", len / 16,
            tvb(o, 8):uint64():tonumber())
        if bit32.band(flags, FLAG_LAST) ~= 0 then text = text .. " LAST" end
        return text
    end
    return ""
end

-- One frame at `offset`. Returns (bytes consumed, Info text), or (-n, nil) when n more bytes
-- are needed for it.
local function dissect_frame(tvb, pinfo, tree, offset)
    local available = tvb:len() - offset
    local len = tvb(offset, 4):uint()
    local kind = tvb(offset + 4, 1):uint()
    local flags = tvb(offset + 5, 1):uint()
    local reserved = tvb(offset + 6, 2):uint()
    local stream = tvb(offset + 8, 4):uint()
    -- As a receiver does, from the 12 header bytes alone and the length first.
    local receiver = hellos[direction_key(pinfo, false)]
    local problem, text
    if receiver and len > receiver.max_frame then
        problem = e.too_large
        text = string.format("Frame body exceeds the receiver's max_frame (%d bytes, max_frame %d)",
            len, receiver.max_frame)
    else
        problem = header_problem(kind, flags, reserved, len, stream)
    end
    -- A receiver ends the connection at a bad header without waiting for its body, and so does
    -- the dissection: the rest is shown as unframed bytes. Without the receiver's Hello, a
    -- length beyond any plausible max_frame is not waited for either.
    local unframed = problem ~= nil or (receiver == nil and len > UNKNOWN_MAX_FRAME)
    if not unframed and available < HEADER_LEN + len then
        return -(HEADER_LEN + len - available), nil
    end
    local name = TYPES[kind] or ("type " .. kind)
    local size = unframed and available or HEADER_LEN + len
    local t = tree:add(volstream, tvb(offset, size),
        string.format("volstream %s, stream %d", name, stream))
    local items = {}
    items[e.too_large] = t:add(f.length, tvb(offset, 4))
    items[e.bad_length] = items[e.too_large]
    items[e.unknown_type] = t:add(f.type, tvb(offset + 4, 1))
    items[e.bad_flags] = t:add(f.flags, tvb(offset + 5, 1))
    if kind == T.FINISH then
        items[e.bad_flags]:add(f.flag_ack, tvb(offset + 5, 1))
        items[e.bad_flags]:add(f.flag_digest, tvb(offset + 5, 1))
    elseif kind == T.OPEN then
        items[e.bad_flags]:add(f.flag_verify, tvb(offset + 5, 1))
        items[e.bad_flags]:add(f.flag_qcow2, tvb(offset + 5, 1))
        items[e.bad_flags]:add(f.flag_ranges, tvb(offset + 5, 1))
        items[e.bad_flags]:add(f.flag_update, tvb(offset + 5, 1))
        items[e.bad_flags]:add(f.flag_resume, tvb(offset + 5, 1))
    elseif kind == T.RANGES then
        items[e.bad_flags]:add(f.flag_last, tvb(offset + 5, 1))
    elseif kind == T.ACCEPT then
        items[e.bad_flags]:add(f.flag_identity, tvb(offset + 5, 1))
    end
    items[e.reserved] = t:add(f.reserved, tvb(offset + 6, 2))
    items[e.bad_stream] = t:add(f.stream, tvb(offset + 8, 4))
    local info = string.format("%s stream %d", name, stream)
    if unframed then
        if problem then
            if text then
                items[problem]:add_proto_expert_info(problem, text)
            else
                items[problem]:add_proto_expert_info(problem)
            end
            t:add_proto_expert_info(e.unframed)
        end
        if available > HEADER_LEN then t:add(f.body, tvb(offset + HEADER_LEN)) end
        return available, info .. (problem and " [malformed]" or " [too large]")
    end
    return HEADER_LEN + len, info .. dissect_body(tvb, pinfo, t, kind, flags, offset + HEADER_LEN, len)
end

-- Several PDUs in a packet, and several calls from TCP for one packet, add to its Info text
-- instead of replacing it.
local function set_info(pinfo, parts)
    if #parts == 0 then return end
    local text = table.concat(parts, ", ")
    if pinfo.private["volstream.info"] then
        pinfo.cols.info:append(", " .. text)
    else
        pinfo.cols.info:set(text)
        pinfo.private["volstream.info"] = "1"
    end
end

function volstream.dissector(tvb, pinfo, tree)
    local total = tvb:len()
    local offset = 0
    local parts = {}
    pinfo.cols.protocol = "volstream"
    while offset < total do
        local available = total - offset
        -- A frame header that begins with the magic would have type 'T', which does not exist:
        -- the magic marks a Hello unambiguously.
        local wanted = HEADER_LEN
        if available >= 8 and tvb(offset, 8):raw() == MAGIC then wanted = HELLO_LEN end
        if available < wanted then
            pinfo.desegment_offset = offset
            pinfo.desegment_len = wanted - available
            break
        end
        local consumed, info
        if wanted == HELLO_LEN then
            consumed, info = HELLO_LEN, dissect_hello(tvb, pinfo, tree, offset)
        else
            consumed, info = dissect_frame(tvb, pinfo, tree, offset)
        end
        if consumed < 0 then
            pinfo.desegment_offset = offset
            pinfo.desegment_len = -consumed
            break
        end
        parts[#parts + 1] = info
        offset = offset + consumed
    end
    set_info(pinfo, parts)
    return total
end

-- Heuristic: a TCP connection whose data starts with the Hello magic is volstream, both ways.
local function heuristic(tvb, pinfo, tree)
    if tvb:len() < 8 or tvb(0, 8):raw() ~= MAGIC then return false end
    pinfo.conversation = volstream
    volstream.dissector(tvb, pinfo, tree)
    return true
end
volstream:register_heuristic("tcp", heuristic)

-- The port preference; "Decode As" (tshark -d tcp.port==N,volstream) works on any port.
volstream.prefs.port = Pref.uint("TCP port", 7700,
    "TCP port dissected as volstream (0: none; the heuristic still finds Hellos)")
local tcp_port = DissectorTable.get("tcp.port")
tcp_port:add_for_decode_as(volstream)
local registered_port = 0

local function register_port()
    if registered_port ~= 0 then tcp_port:remove(registered_port, volstream) end
    registered_port = volstream.prefs.port
    if registered_port ~= 0 then tcp_port:add(registered_port, volstream) end
end

function volstream.prefs_changed()
    register_port()
end
register_port()
