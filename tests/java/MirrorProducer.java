// A producer in another language: mirrors requests into shadowlens with nothing but the official
// Kafka client (org.apache.kafka:kafka-clients from Maven Central) and the JDK, following the wire
// contract (schemas/mirrored_request.v1.schema.json, schemas/wire.py): key = request_id, value =
// UTF-8 JSON, tensors as base64 of little-endian float32 bytes.
//
// Usage: java -cp <kafka libs>/*:. MirrorProducer BOOTSTRAP TOPIC SPEC_FILE
// SPEC_FILE lines: request_id sent_ms latency_ms country p1..p64 q1..q10 (decimal float32 values)
import java.io.BufferedReader;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Instant;
import java.util.Base64;
import java.util.Properties;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class MirrorProducer {
    static String tensor(float[] values) {
        ByteBuffer buf = ByteBuffer.allocate(4 * values.length).order(ByteOrder.LITTLE_ENDIAN);
        for (float v : values) buf.putFloat(v);
        return "{\"dtype\":\"float32\",\"shape\":[1," + values.length + "],\"data\":\""
            + Base64.getEncoder().encodeToString(buf.array()) + "\"}";
    }

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        props.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        int sent = 0;
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(props);
             BufferedReader in = Files.newBufferedReader(Path.of(args[2]))) {
            String line;
            while ((line = in.readLine()) != null) {
                String[] f = line.trim().split(" ");
                float[] pixels = new float[64];
                float[] probs = new float[10];
                for (int i = 0; i < 64; i++) pixels[i] = Float.parseFloat(f[4 + i]);
                for (int i = 0; i < 10; i++) probs[i] = Float.parseFloat(f[68 + i]);
                String json = "{\"schema_version\":1,\"request_id\":\"" + f[0] + "\",\"model\":\"digits\","
                    + "\"baseline_version\":\"v1\",\"sent_at\":\"" + Instant.ofEpochMilli(Long.parseLong(f[1])) + "\","
                    + "\"inputs\":{\"pixels\":" + tensor(pixels) + "},"
                    + "\"baseline_output\":{\"probabilities\":" + tensor(probs) + "},"
                    + "\"baseline_latency_ms\":" + f[2] + ",\"attributes\":{\"country\":\"" + f[3] + "\"}}";
                producer.send(new ProducerRecord<>(args[1], f[0].getBytes(StandardCharsets.UTF_8),
                                                   json.getBytes(StandardCharsets.UTF_8))).get();
                sent++;
            }
        }
        System.out.println("sent " + sent);
    }
}
